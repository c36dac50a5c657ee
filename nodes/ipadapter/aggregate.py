"""Several reference photos of one person -> one IP-Adapter embedding: mean, max, norm-mean or a trained
self-attention aggregator (K. M. Kazistova, I. D. Stepanov, A. V. Filatov,
"Создание персонализированных генераций изображений" [Creating personalized image generations],
MIPT / Skoltech, undated, after 2023; no arXiv id). The maths is ``py/ipadapter/aggregate.py``; the other
IP-Adapter nodes are in ``ipadapter.py``.
"""

from __future__ import annotations

import logging

import folder_paths

from ...py.ipadapter import aggregate as agg
from .. import model_cache
from ..common import REF_EMBEDS, seed_input
from .adapter import CATEGORY

log = logging.getLogger("facecond")

AGGREGATOR_FOLDER = "facecond_aggregators"  # models/facecond/aggregators, registered by nodes/model_paths.py


class AggregateEmbeds:
    DESCRIPTION = ("Several references of one person -> one embedding (Kazistova et al.): mean, max, norm-mean, or "
                   "a trained self-attention aggregator (models/facecond/aggregators, trained with "
                   "scripts/train_aggregator.py on N references: more are cut to the first N, fewer bootstrapped "
                   "with the seed; its mode, residual or paper (Algorithm 1), is read from the file and named in "
                   "the report). An aggregator trained with --train adapter belongs to the IP-Adapter file of the "
                   "same name. Unusable references are skipped with a report.")
    CATEGORY = CATEGORY
    FUNCTION = "aggregate"
    RETURN_TYPES = (REF_EMBEDS, "STRING")
    RETURN_NAMES = ("embeds", "report")
    OUTPUT_TOOLTIPS = ("One aggregated embedding (empty if no reference was usable).",
                       "How many references went in, which were skipped, cut or resampled.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "embeds": (REF_EMBEDS, {"tooltip": "N reference embeddings from IPAdapterEncode."}),
            "method": (list(agg.METHODS), {"default": "mean", "tooltip":
                       "mean / max: average or element-wise max pooling. norm-mean: mean of unit-length rows, "
                       "rescaled to their mean length. self-attention: the trained aggregator below."}),
            "aggregator_name": (["none", *folder_paths.get_filename_list(AGGREGATOR_FOLDER)], {"default": "none",
                                "tooltip": "Self-attention weights in models/facecond/aggregators (method "
                                "self-attention only)."}),
            "seed": seed_input("Self-attention with fewer references than it was trained on: seed of the resampling.",
                               control_after_generate=False),
        }}

    def aggregate(self, embeds, method, aggregator_name, seed):
        node = "AggregateEmbeds"
        if not isinstance(embeds, agg.RefEmbeds):
            raise ValueError(f"{node}: input 'embeds' must come from IPAdapterEncode (got {type(embeds).__name__}).")
        embeds = agg.drop_unusable(embeds)
        if len(embeds) == 0:
            report = "; ".join(["no usable reference: the IP-Adapter will be skipped", *embeds.notes])
            log.warning("[facecond] %s: %s", node, report)
            return (embeds, report)
        aggregator = None
        if method == "self-attention":
            if aggregator_name == "none":
                raise ValueError(f"{node}: method self-attention needs aggregator_name (a file in "
                                 "models/facecond/aggregators from scripts/train_aggregator.py), or pick mean.")
            aggregator = model_cache.load_picked("aggregator", node, "aggregator_name", AGGREGATOR_FOLDER,
                                                 aggregator_name, agg.load_aggregator)
            model_cache.to_device(aggregator)
        try:
            x, note = agg.aggregate(embeds.embeds, method, aggregator, seed)
        except ValueError as e:
            raise ValueError(f"{node}: {e}. Use an aggregator trained on these embeddings ({embeds.model}).") from None
        clip = None
        if embeds.clip is not None:  # FaceID Plus: the face crops' CLIP hidden states, per position (self-attention:
            clip, _ = agg.aggregate(embeds.clip, "mean" if method == "self-attention" else method, None, seed)  # mean)
            note += f"; CLIP face-crop hidden states: {'mean' if method == 'self-attention' else method}"
        out = agg.RefEmbeds(x, embeds.kind, embeds.model, (-1,), (*embeds.notes, note), clip=clip,
                            clip_neg=embeds.clip_neg)
        report = "; ".join(out.notes)
        log.info("[facecond] %s: %s", node, report)
        return (out, report)


NODE_CLASS_MAPPINGS = {"FacecondAggregateEmbeds": AggregateEmbeds}
NODE_DISPLAY_NAME_MAPPINGS = {"FacecondAggregateEmbeds": "AggregateEmbeds"}
