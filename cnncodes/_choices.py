"""The values the library's settings accept, written once: functions check against them, the CLI offers them.

A leaf module (it imports nothing), so that the command line builds its parser, choices
included, without importing torch or scikit-learn. The modules that check a setting import
its tuple from here under the name they always had (``_extract.DTYPES``, ``_fit.CLASSIFIERS``).
"""

# extraction (`extract`, `CNNCodes`)
ENGINES = ("local", "ray")
POOLINGS = ("avg", "max", "gem", "flatten", "spp", "cls", "cls+avg")
# Spatial pyramid: average pools over 1x1, 2x2 and 4x4 grids of a feature map, concatenated.
SPP_LEVELS = (1, 2, 4)
# Poolings of a ViT's token outputs only: the class token, or it and the patch tokens' mean.
TOKEN_POOLINGS = ("cls", "cls+avg")
DTYPES = ("float32", "float16")
TTAS = ("none", "flip", "mirror")  # mirror: the mirror image's codes alone (augmentation rows for fit)
RESIZES = ("workers", "device")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
DEFAULT_BACKBONE = "mobilenet_v2"
IMAGENET = "imagenet"  # the weights name meaning each architecture's original ImageNet weights

# classifiers (`fit`, `sweep`)
CLASSIFIERS = ("logreg", "linear_svm", "knn", "sgd")
NORMALIZE = ("l2", "power")
METRICS = ("l2", "cosine", "ip")  # of the knn classifier; "euclidean" is accepted for "l2" too
PROBES = ("logreg", "linear_svm")  # the sweep's linear probes

# fine-tuning: its test-time augmentation (no "mirror": that makes augmentation rows of a store)
FINETUNE_TTAS = ("none", "flip")

# export
FORMATS = ("onnx", "torchscript")


def check_pooling(pooling: str) -> str:
    """`pooling`, or `InvalidParameterError` naming the valid ones."""
    from cnncodes._errors import InvalidParameterError

    if pooling not in POOLINGS:
        raise InvalidParameterError(f"unknown pooling {pooling!r}. Valid poolings: {', '.join(POOLINGS)}.")
    return pooling
