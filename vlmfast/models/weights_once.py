"""A generative model's weights resident once: the model methods that run its GEMMs in inference do
so under the model's `cache_packed_weights` (False unless the user sets it).

vlmfast.ops.linear keeps a packed copy of a weight from its second inference use on (by default:
a frozen tower serving embeddings packs once). For a generative model that copy is a second set
of weights: after a second generate, SmolVLM2-256M held 284 MiB more in bf16 and 756 MiB more in
float32, for a prompt 3-4 % faster (2-core AMD EPYC Zen 4, one 512-px image + 20 text + 8 new
tokens, alternating in one process). So these models pack per call unless told otherwise.
"""

import functools

import torch

from vlmfast.ops.linear import packed_weight_cache


def weights_held_once(method):
    """Runs a model method under packed_weight_cache(self.cache_packed_weights); under
    torch.compile as it is (a compiled graph packs no weights of ours, and dynamo cannot trace
    the context variable's set and reset)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return method(self, *args, **kwargs)
        with packed_weight_cache(self.cache_packed_weights):
            return method(self, *args, **kwargs)
    return run
