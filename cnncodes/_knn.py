"""Where FaissKNNClassifier was: model files written before 0.2 name cnncodes._knn.FaissKNNClassifier. Kept so that they load; new code imports cnncodes._classify.knn."""

from cnncodes._classify.knn import FaissKNNClassifier  # noqa: F401
