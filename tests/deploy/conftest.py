# the real-server fixtures, shared with the service tests
from tests.conftest import redis_server, start_server, test_sequences  # noqa: F401
