"""Whether a trained adapter beats the base model on the held-out split: the rule for publishing it."""
from __future__ import annotations


def beats_base(base: dict, tuned: dict, min_improvement: float = 0.0) -> tuple[bool, str]:
    """Publish only if the held-out loss fell by more than `min_improvement` (a fraction of the base loss)
    and task accuracy, where the data set has answers, did not fall."""
    bl, tl = base.get("loss"), tuned.get("loss")
    if bl is None or tl is None:
        return False, "no held-out loss to compare (the eval split is empty or has no assistant tokens)"
    gain = (bl - tl) / bl if bl else 0.0
    numbers = f"held-out loss {bl:.4f} -> {tl:.4f} ({gain:+.1%})"
    ba, ta = base.get("accuracy"), tuned.get("accuracy")
    if ba is not None and ta is not None:
        numbers += f", accuracy {ba:.3f} -> {ta:.3f}"
        if ta < ba:
            return False, f"not published: accuracy fell; {numbers}"
    if gain <= min_improvement:
        return False, f"not published: the loss gain is not above {min_improvement:.1%}; {numbers}"
    return True, numbers
