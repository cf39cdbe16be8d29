"""The scikit-learn transformer CNNCodes and its content-keyed cache."""
