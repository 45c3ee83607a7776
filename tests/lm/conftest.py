"""LM tests run offline: the Hub is off and any socket connection fails the test."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an LM test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
