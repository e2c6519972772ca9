"""LexVLA (Li et al., NeurIPS 2024): image and text as lexical vectors over one vocabulary.

The model is `model.name: lexvla` (`vlalign/models/lexical.py`): a frozen image backbone with a
trainable adapter, mapper and visual codebook; a language model read at the prediction position
of an in-context prompt (`data.text_template`), its base weights frozen and LoRA adapters trained
(`model.text.lora`), scored against its own frozen codebook. Losses: `itc` on the unit lexical
vectors plus the `overuse` penalty per modality (or `flops`, the ablation), with weights ramped
quadratically (`weight_schedule`; `vlalign/losses/lexical.py`).

This method adds to the two-tower one: the frozen sub-trees, lexical statistics in the train log
(`lexical/<img|txt>_active`: entries above `1/sqrt(V)`, LexVLA's inference threshold, and
`lexical/<img|txt>_sparsity`: the percent of entries at or below it), and the
prediction functions of the lexical evaluators (`lexical_retrieval`, `patchdis`,
`lexical_words`) and of `python -m vlalign.explain`.

Config section `lexvla` (all optional): freeze_image (True: the whole image tower),
freeze_text ("lora": every text-tower weight but the LoRA adapters, which needs
`model.text.lora`; True: the whole tower; False: none). Equations and sources: docs/methods.md.
"""

from collections.abc import Callable
from typing import Any

import jax

from vlalign.errors import ConfigError
from vlalign.losses import LossContext
from vlalign.losses.lexical import active_words
from vlalign.methods import register
from vlalign.methods.base import Method, Outputs, check_section

DEFAULTS = dict(freeze_image=True, freeze_text="lora")
# Every text-tower parameter except the LoRA adapters (`<projection>_lora/{a,b}`).
TEXT_BASE_PATTERN = "text_encoder/(?!.*_lora/).*"


@register("lexvla")
class LexVLA(Method):
  """Lexical image-text alignment; see the module docstring."""

  config_fields = ("lexvla",)
  student_tokens = True  # the lexical model's patch and word scores come from the tokens

  def validate(self) -> None:
    if self.config.model.get("name") != "lexvla":
      raise ConfigError(
        f"method 'lexvla' needs model.name='lexvla', got {self.config.model.get('name')!r}"
      )
    fields = {}
    if self.config.get("lexvla") is not None:
      fields = check_section(self.config, "lexvla", set(), set(DEFAULTS))
    self.settings = {**DEFAULTS, **fields}
    freeze_text = self.settings["freeze_text"]
    if freeze_text not in ("lora", True, False):
      raise ConfigError(
        f"config.lexvla.freeze_text must be 'lora', True or False, not {freeze_text!r}"
      )
    if freeze_text == "lora" and not self.config.model.text.get("lora"):
      raise ConfigError(
        "config.lexvla.freeze_text='lora' trains only the text tower's LoRA adapters, but "
        "model.text.lora is not set; set it (rank, alpha, dropout, targets) or use "
        "freeze_text=True / False"
      )

  def frozen_patterns(self) -> tuple[str, ...]:
    patterns = []
    if self.settings["freeze_image"]:
      patterns.append("image_encoder/.*")
    if self.settings["freeze_text"] == "lora":
      patterns.append(TEXT_BASE_PATTERN)
    elif self.settings["freeze_text"]:
      patterns.append("text_encoder/.*")
    return tuple(patterns)

  def step_metrics(
    self, ctx: LossContext, outputs: Outputs, extras: dict[str, Any]
  ) -> dict[str, jax.Array]:
    del ctx, extras
    metrics = {}
    for modality in ("img", "txt"):
      lex = outputs[f"{modality}/lex"]
      active = active_words(lex)
      metrics[f"lexical/{modality}_active"] = active
      metrics[f"lexical/{modality}_sparsity"] = 100.0 * (1.0 - active / lex.shape[-1])
    return metrics

  def predict_fns(self) -> dict[str, Callable[..., Any]]:
    """The two-tower functions (unit lexical vectors as embeddings) plus
    `lexical_image(params, images) -> [B, V]`, `lexical_text(params, ids, mask) -> [B, V]` (unit,
    non-negative), `lexical_patches(params, images) -> [B, N, V]` (activated word scores of each
    patch, row-major patch grid) and `lexicon_ids(params) -> [V]` (each entry's token id)."""
    model, cls = self.model, type(self.model)

    def lexical_image(params, images):
      return model.apply(params, images, method=cls.encode_image)["img/lex"]

    def lexical_text(params, ids, mask):
      return model.apply(params, ids, mask, method=cls.encode_text)["txt/lex"]

    def lexical_patches(params, images):
      return model.apply(params, images, method=cls.encode_image)["img/patch_lex"]

    def lexicon_ids(params):
      return model.apply(params, method=cls.lexicon)

    return {
      **super().predict_fns(),
      "lexical_image": lexical_image,
      "lexical_text": lexical_text,
      "lexical_patches": lexical_patches,
      "lexicon_ids": lexicon_ids,
    }
