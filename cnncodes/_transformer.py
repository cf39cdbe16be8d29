"""Where CNNCodes was: pipelines pickled before 0.2 name cnncodes._transformer.CNNCodes. Kept so that they load; new code imports cnncodes._transform.transformer."""

from cnncodes._transform.transformer import CNNCodes  # noqa: F401
