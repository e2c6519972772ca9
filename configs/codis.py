"""CODIS: ALBEF + a representation codebook, contrast through balanced cluster assignments.

Duan et al., "Multi-modal Alignment using Representation Codebook", CVPR 2022 (no public code;
the reconstruction and its free choices are in docs/methods.md, "CODIS").
`--config=configs/codis.py:tiny|demo|full`.

Method `codis` (`vlalign/methods/codis.py`): the `momentum` method (EMA teachers, queues, alpha,
ITM, MLM) with the teacher seeing a second augmented view of the image (the unimodal image term),
plus K centres (`model.codebook_size`) and the teachers' Sinkhorn assignments of [batch | queue].
Loss: `cma` (ITC against the queues, ALBEF's `loss_ita`) + `itm` + `mlm` + `code_distill`
(cross-modal code distillation) + `code_contrast` (instance contrast through assignments) +
`code_intra` (unimodal code prediction). Set the three `code_*` weights to 0 for the ablation
without the codebook terms.
"""

import ml_collections

from configs import albef, common

# Codebook sizes per variant: "a few thousand" centres at full scale; the demo data has 8 colours,
# 6 shapes and a few relations, so 64 centres can all find a use.
CODEBOOK_SIZE = {"tiny": 16, "demo": 64, "full": 4096}
CODE_TERMS = ("code_distill", "code_contrast", "code_intra")


@common.with_data_suffixes
def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
  c = albef.albef_config(variant, "codis")
  c.method = "codis"
  c.model.codebook_size = CODEBOOK_SIZE[variant]
  c.teacher.image_key = "image_aug"  # the teacher's image: a second view (unimodal image term)
  c.data.augment_views = 2
  augment = albef.DEMO_AUGMENT if variant in ("tiny", "demo") else {}
  c.data.augment = dict(name="albef", **augment)
  c.codis = dict(
    epsilon=0.05,  # SwAV's
    sinkhorn_iterations=3,  # SwAV's
    sinkhorn_queue=True,
    target_codebook="student",
    usage_window={"tiny": 2, "demo": 50, "full": 1000}[variant],
    reinit_dead=False,
  )
  c.losses = dict(
    cma=dict(weight=1.0),
    itm=dict(weight=1.0),
    mlm=dict(weight=1.0),
    code_distill=dict(weight=1.0, temperature=0.1),
    code_contrast=dict(weight=1.0, temperature=0.1, contrast_temperature=0.05),
    code_intra=dict(weight=1.0, temperature=0.1),
  )
  every = {"tiny": 0, "demo": 200, "full": 10_000}[variant]
  c.evals["codebook_test"] = dict(type="codebook", split="test", every_steps=every)
  return c
