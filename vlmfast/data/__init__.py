"""Data: the built-in synthetic data set, image folders, and near-duplicate removal.

Each module adds its public names below (additive edits only: several people own modules here).
"""

# Near-duplicate removal (perceptual hashes, Hamming pair search).
from vlmfast.data.dedup import DedupResult, dedup_folder, find_duplicate_pairs, find_duplicates  # noqa: E402
from vlmfast.data.phash import phash, phash_many  # noqa: E402

# The built-in data set: coloured shapes with captions (vlmfast demo trains on it).
from vlmfast.data.synthetic import CLASSES, SyntheticShapes, caption_vocabulary  # noqa: E402

# Image-text instruction data (JSONL chat format) for `vlmfast finetune`, and its built-in example set.
from vlmfast.data.instruction_collate import InstructionCollator, answer_spans  # noqa: E402
from vlmfast.data.instructions import InstructionExample, read_instructions, write_instruction_examples  # noqa: E402
