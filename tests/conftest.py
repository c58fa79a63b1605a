import logging

import pytest

from services.common.etcd_server import EtcdServer


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    yield


@pytest.fixture
def etcd(tmp_path):
    """A running etcd on free loopback ports, data in tmp_path; stopped (and reaped) afterwards.

    Function-scoped because tests pause, stop and restart it.
    """
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.stop()
