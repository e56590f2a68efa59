"""Converters from other learned-optimizer checkpoint formats to lopt_hf artifacts.

The authors' flax ``theta.state`` files of the Celo family, read without JAX and without
unpickling (:mod:`.flax_msgpack`): Celo2 / Celo2-base (:mod:`.celo2`), Celo / Celo-Adam
(:mod:`.celo`), VeLO (:mod:`.velo`). :mod:`.foreign` recognises which one a file is and caches
conversions, so ``load_lopt("amoudgl/celo", model)`` loads the authors' repo directly;
:mod:`.checkpoint` holds the shared reading, checking and atomic writing.
"""
