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


def _images(manifest):
    return [(cls, key, img.tobytes()) for img, cls, key, _ in SplitImages(manifest.split("test"), raw=True)]


def test_shards_over_http_and_through_a_pipe_read_as_the_local_ones(tiny_shards, http_root, tmp_path):
    local = shards.load_manifest(tiny_shards)
    pipe_root = f"pipe:cat {tiny_shards}/{{file}}"
    remote = {root: shards.load_manifest(root) for root in (http_root, pipe_root)}
    assert all(m.data == local.data and m.root == root for root, m in remote.items())
    expected = _images(local)
    assert len(expected) == local.images("test")
    assert _images(remote[http_root]) == expected and _images(remote[pipe_root]) == expected

    cfg = tiny_config(tmp_path)
    batches = {}
    for name, manifest in (("local", local), ("http", remote[http_root]), ("pipe", remote[pipe_root])):
        stream = BalancedStream(manifest, cfg.sampler, train_augment(cfg.augment, 32), seed=1)
        batches[name] = [(images.sum().item(), labels.tolist()) for images, labels in stream]
    assert batches["http"] == batches["local"] == batches["pipe"]  # checksums verified on the way, too


def test_a_pipe_root_without_the_file_placeholder_is_one_clear_error():
    from pipeline.data.samples import shard_url

    with pytest.raises(ValueError, match="a pipe: command needs {file} where the shard name goes"):
        shard_url("pipe:cat /data/shards", "train-00000.tar")
