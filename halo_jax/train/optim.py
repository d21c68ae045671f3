"""The one optimizer of every training stage.

    lr(s) = linear warmup 0 -> learning_rate over warmup_steps, then cosine decay to
            0.1 * learning_rate at s = horizon (horizon = `steps`, or `schedule_steps` when set)
    update = AdamW(lr, weight_decay) after clipping the gradient to global norm `grad_clip`
"""

from __future__ import annotations

import optax


def make_optimizer(section, steps: int | None = None) -> optax.GradientTransformation:
    """`section` has learning_rate, warmup_steps, grad_clip, weight_decay, steps (and maybe schedule_steps)."""
    horizon = int(steps if steps is not None else (section.get("schedule_steps", 0) or section.steps))
    schedule = optax.warmup_cosine_decay_schedule(0.0, section.learning_rate, section.warmup_steps,
                                                  max(horizon, section.warmup_steps + 1),
                                                  end_value=0.1 * section.learning_rate)
    return optax.chain(optax.clip_by_global_norm(section.grad_clip),
                       optax.adamw(schedule, weight_decay=section.weight_decay))
