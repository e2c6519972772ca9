"""TCL intra-modal contrast (IMC) and TCL's full `loss_ita` (CMA + IMC + LMI).

Reference: uta-smile/TCL `models/model_pretrain.py`, `ALBEF.forward` (`loss_i2i`, `loss_t2t`,
`loss_ita`).

Equations (s = student, t = momentum teacher, Q = queue, tau = clamped student temperature
`vlalign.losses.momentum.temperature`, e_i the one-hot target of column i):

    i2i = mean_i CE(s_img_i . [t_img | Q_img] / tau, e_i)   student image (view 1) vs teacher image
                                                             (view 2) and the image queue
    t2t = mean_i CE(s_txt_i . [t_txt | Q_txt] / tau, e_i)   student text vs teacher text (its own
                                                             dropout) and the text queue
    imc = (i2i + t2t) / 2
    tcl_ita = (i2t + t2i + i2i + t2t + lmi_img + lmi_txt) / 6    (`loss_ita` of the reference)

with i2t, t2i from `vlalign.losses.momentum.cma` and lmi_img, lmi_txt from
`vlalign.losses.local_mi.lmi`.

Soft targets: the reference uses momentum-distilled soft targets only for i2t / t2i; i2i and t2t use
the hard `sim_targets` (one-hot diagonal). We do the same; `imc(..., alpha=...)` is deliberately not
offered because the reference defines no teacher distribution for the intra-modal terms.

Decisions where the reference is silent: none beyond those of `momentum` and `local_mi`;
`match_image_id=True` switches the hard targets to the retrieval fine-tuning ones
(`models/model_retrieval.py`: every column with the same image id), for all four global terms.
"""

import jax
import jax.numpy as jnp

from vlalign.losses import LossContext, Metrics, register, require
from vlalign.losses.local_mi import lmi_terms
from vlalign.losses.momentum import (
  cma_terms,
  positives_for,
  soft_cross_entropy,
  temperature,
  with_queue,
)


def imc_terms(
  outputs: dict[str, jax.Array], ctx: LossContext, match_image_id: bool = False
) -> dict[str, jax.Array]:
  """`{"i2i", "t2t", "temperature"}`, each `[]` (see the module docstring)."""
  require(ctx, "imc", teacher=("img/emb", "txt/emb"), extras=("queue/img", "queue/txt"))
  tau = temperature(outputs)
  img_all = with_queue(ctx, "img/emb", "queue/img")
  txt_all = with_queue(ctx, "txt/emb", "queue/txt")
  targets = positives_for(ctx, img_all.shape[0], match_image_id, "imc")
  img = outputs["img/emb"].astype(jnp.float32)
  txt = outputs["txt/emb"].astype(jnp.float32)
  i2i = jnp.mean(soft_cross_entropy(img @ img_all.T / tau, targets))
  t2t = jnp.mean(soft_cross_entropy(txt @ txt_all.T / tau, targets))
  return {"i2i": i2i, "t2t": t2t, "temperature": tau}


@register("imc")
def imc(
  outputs: dict[str, jax.Array], ctx: LossContext, match_image_id: bool = False
) -> tuple[jax.Array, Metrics]:
  """Intra-modal contrast: student `img/emb`, `txt/emb` `[B, E]` vs `ctx.teacher` `img/emb`,
  `txt/emb` `[B, E]` and `ctx.extras` `queue/img`, `queue/txt` `[K, E]`, hard targets.

  Returns:
    `((i2i + t2t) / 2, {"i2i", "t2t", "temperature"})`.
  """
  terms = imc_terms(outputs, ctx, match_image_id)
  return 0.5 * (terms["i2i"] + terms["t2t"]), terms


@register("tcl_ita")
def tcl_ita(
  outputs: dict[str, jax.Array], ctx: LossContext, grid: int = 4, match_image_id: bool = False
) -> tuple[jax.Array, Metrics]:
  """TCL `loss_ita`: the mean of i2t, t2i, i2i, t2t, lmi_img and lmi_txt.

  Reads everything `cma`, `imc` and `lmi` read.

  Returns:
    `(mean of the six, {"i2t", "t2i", "i2i", "t2t", "lmi_img", "lmi_txt", "temperature"})`.
  """
  cross = cma_terms(outputs, ctx, match_image_id)
  intra = imc_terms(outputs, ctx, match_image_id)
  local = lmi_terms(outputs, ctx, grid)
  metrics = {
    "i2t": cross["i2t"],
    "t2i": cross["t2i"],
    "i2i": intra["i2i"],
    "t2t": intra["t2t"],
    "lmi_img": local["img"],
    "lmi_txt": local["txt"],
  }
  loss = sum(metrics.values()) / len(metrics)
  metrics["temperature"] = cross["temperature"]
  return loss, metrics
