"""Evaluation: VQA accuracy, caption metrics (BLEU, CIDEr-D, ROUGE-L), Recall@K and zero-shot
accuracy, and runners that evaluate a model on the standard file formats (vlmfast.eval.runners).

    from vlmfast.eval import vqa_accuracy, cider_d, bleu, rouge_l, recall_at_k
"""

from vlmfast.eval.caption import bleu, cider_d, rouge_l, tokenize_caption
from vlmfast.eval.retrieval import recall_at_k, zero_shot_accuracy
from vlmfast.eval.vqa import normalize_answer, vqa_accuracy

from vlmfast.eval import runners  # noqa: E402  (after the metrics it uses)

__all__ = [
    "bleu",
    "cider_d",
    "normalize_answer",
    "recall_at_k",
    "rouge_l",
    "runners",
    "tokenize_caption",
    "vqa_accuracy",
    "zero_shot_accuracy",
]
