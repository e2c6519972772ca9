"""TCL: triple contrastive learning (CMA + IMC + LMI) on the ALBEF model, with ITM and MLM.

Yang et al., "Vision-Language Pre-Training with Triple Contrastive Learning", CVPR 2022
(uta-smile/TCL `configs/Pretrain.yaml`, `models/model_pretrain.py`, `dataset/__init__.py`).
`--config=configs/tcl.py:tiny|demo|full|published|coco|flickr` (the last three: the paper's
4M pre-training and retrieval fine-tuning runs as published; `tiny_published`, `tiny_retrieval`:
their switches on the tiny model).

Differences from `configs/albef.py`: two augmented views per image (view 1 to the student, view 2
`image_aug` to the momentum teacher) with TCL's pre-training transform, and the loss
`tcl_ita` (the mean of i2t, t2i, i2i, t2t, LMI image, LMI text) + `itm` + `mlm`, as
`loss_ita + loss_itm + loss_mlm` in TCL's `Pretrain.py`. Everything else (model, queue 65,536,
momentum 0.995, alpha 0.4, optimizer, schedule) is the ALBEF recipe, which TCL keeps.
"""

import ml_collections

from configs import albef, common


@common.with_data_suffixes
def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
  if variant in albef.PUBLISHED:  # the published runs (configs/albef.py, `published_recipe`)
    c = albef.published_recipe(variant, "tcl", {"tcl_ita": {"grid": 4}})
  else:
    c = albef.albef_config(variant, "tcl")
    c.losses = dict(
      tcl_ita=dict(weight=1.0, grid=4),
      itm=dict(weight=1.0),
      mlm=dict(weight=1.0),
    )
  c.teacher.image_key = "image_aug"
  c.data.augment_views = 2
  if variant.startswith("tiny"):
    c.data.augment = dict(name="tcl", **albef.DEMO_AUGMENT)
  return c
