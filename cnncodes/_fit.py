"""Where CodeNormalizer was: model files name cnncodes._fit.CodeNormalizer (its __module__, kept stable). Kept so that they load; new code imports cnncodes._classify.fit."""

from cnncodes._classify.fit import CodeNormalizer  # noqa: F401
