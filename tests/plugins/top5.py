"""A user-defined experiment metric, written outside sinkinterp: top-5 accuracy per sequence."""

from sinkinterp import register_metric


def top5(logits, targets):
    """Share of scored queries whose next token is among the 5 largest logits: one number per sequence."""
    return (logits.topk(5, dim=-1).indices == targets[..., None]).any(dim=-1).double().mean(dim=-1)


register_metric("top5", top5, description="next token among the top 5 logits", higher_is_better=True)
