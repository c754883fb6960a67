"""Names and bounds that the config, the seed-file check and the model loader share: one home for each.

A leaf module (it imports nothing), so every layer may use it, as it may `errors.py`.
"""

SAMPLER_NAMES = ("ddim", "euler", "dpmpp_2m", "lcm")  # `sampler.name`; core/samplers.py says what each is
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # `runtime.dtype` besides auto, and a seed file's `dtype`
COMMIT_CHARACTERS = frozenset("0123456789abcdef")  # a Hugging Face Hub commit id: 40 of these
# Beyond these a value is a slip (10**12 images, a 65536-pixel side), refused before anything is allocated.
MAX_IMAGES = 100_000  # per class and run
MAX_SIDE = 4096  # pixels
MAX_STEPS = 1000  # a scheduler's training timesteps
MAX_ITERATIONS = 100_000
MAX_BATCH = 1024
# The tables a command prints at its end show this many classes one by one, then the rest together: a sweep over
# hundreds of classes gets a screen, not pages (every class is in the manifest and in RUN/report/).
SHOWN_CLASSES = 20


def is_commit(text: object) -> bool:
    """Whether `text` is a Hugging Face Hub commit id (40 lower-case hexadecimal digits), as a seed file or
    manifest line read back from disk must hold before it is passed to the Hub as a revision."""
    return isinstance(text, str) and len(text) == 40 and set(text) <= COMMIT_CHARACTERS
