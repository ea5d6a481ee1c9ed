"""Shards read from where training reads them in practice: an HTTP server and a pipe: command."""

import functools
import http.server
import threading

import pytest

from pipeline.data import shards
from pipeline.data.samples import SplitImages
from pipeline.data.stream import BalancedStream
from pipeline.data.transforms import train_augment
from tests.conftest import tiny_config


@pytest.fixture()
def http_root(tiny_shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_shards))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _images(root, manifest):
    return [(cls, key, img.tobytes()) for img, cls, key, _ in SplitImages(manifest, root, "test", raw=True)]


def test_shards_over_http_and_through_a_pipe_read_as_the_local_ones(tiny_shards, http_root, tmp_path):
    local = shards.load_manifest(tiny_shards)
    assert shards.load_manifest(http_root) == local
    pipe_root = f"pipe:cat {tiny_shards}/{{file}}"
    assert shards.load_manifest(pipe_root) == local
    expected = _images(str(tiny_shards), local)
    assert len(expected) == local["splits"]["test"]["samples"]
    assert _images(http_root, local) == expected and _images(pipe_root, local) == expected

    cfg = tiny_config(tmp_path)
    batches = {}
    for name, root in (("local", str(tiny_shards)), ("http", http_root), ("pipe", pipe_root)):
        stream = BalancedStream(local, root, cfg.sampler, train_augment(cfg.augment, 32), seed=1)
        batches[name] = [(images.sum().item(), labels.tolist()) for images, labels in stream]
    assert batches["http"] == batches["local"] == batches["pipe"]  # checksums verified on the way, too


def test_a_pipe_root_without_the_file_placeholder_is_one_clear_error():
    from pipeline.data.samples import shard_url

    with pytest.raises(ValueError, match="a pipe: command needs {file} where the shard name goes"):
        shard_url("pipe:cat /data/shards", "train-00000.tar")
