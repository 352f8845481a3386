"""The committed protobuf messages match the .proto files, and the protos match containerd's
names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf.message import Message

from meshmirror.containerd.proto import (
    content_events_pb2,
    content_pb2,
    descriptor_pb2,
    events_pb2,
    image_events_pb2,
    images_pb2,
)

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "meshmirror" / "containerd" / "proto"


def _generated(directory: Path) -> dict[str, bytes]:
    """Every generated-looking file, grpcio service stubs included, so one that comes back
    (committed, or generated again) fails the comparison."""
    return {p.name: p.read_bytes() for p in directory.iterdir()
            if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))}


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gen-protos"),
                             "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    fresh = _generated(tmp_path / "meshmirror" / "containerd" / "proto")
    committed = _generated(PROTO_DIR)
    protos = sorted(p.stem for p in PROTO_DIR.glob("*.proto"))
    assert fresh, "gen-protos produced nothing"
    assert sorted(fresh) == sorted(committed), "stub files differ; run scripts/gen-protos"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}; run scripts/gen-protos and commit"
    assert {n.split("_pb2")[0] for n in fresh} == set(protos)


def test_staleness_is_detected(tmp_path: Path) -> None:
    """The check above can fail: a changed .proto yields different stubs."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(PROTO_DIR, copy / "meshmirror" / "containerd" / "proto",
                    ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    (copy / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "gen-protos", copy / "scripts" / "gen-protos")
    proto = copy / "meshmirror" / "containerd" / "proto" / "descriptor.proto"
    proto.write_text(proto.read_text().replace("int64 size = 3;", "int64 size = 4;"))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(copy / "scripts" / "gen-protos"),
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    fresh = _generated(out / "meshmirror" / "containerd" / "proto")
    assert fresh["descriptor_pb2.py"] != _generated(PROTO_DIR)["descriptor_pb2.py"]


def test_names_and_field_numbers_match_containerd() -> None:
    """Wire compatibility rests on these; values read from containerd 1.6's api/*.proto."""
    def fields(message: type[Message]) -> dict[str, int]:
        descriptor = message.DESCRIPTOR
        return {f.name: f.number for f in descriptor.fields}

    assert descriptor_pb2.Descriptor.DESCRIPTOR.full_name == "containerd.types.Descriptor"
    assert fields(descriptor_pb2.Descriptor) == {"media_type": 1, "digest": 2, "size": 3,
                                                 "annotations": 5}
    assert images_pb2.DESCRIPTOR.services_by_name["Images"].full_name == \
        "containerd.services.images.v1.Images"
    assert fields(images_pb2.Image) == {"name": 1, "labels": 2, "target": 3, "created_at": 7,
                                        "updated_at": 8}
    assert content_pb2.DESCRIPTOR.services_by_name["Content"].full_name == \
        "containerd.services.content.v1.Content"
    assert fields(content_pb2.ReadContentRequest) == {"digest": 1, "offset": 2, "size": 3}
    assert fields(content_pb2.ReadContentResponse) == {"offset": 1, "data": 2}
    assert fields(content_pb2.Info) == {"digest": 1, "size": 2, "created_at": 3,
                                        "updated_at": 4, "labels": 5}
    assert fields(events_pb2.Envelope) == {"timestamp": 1, "namespace": 2, "topic": 3,
                                           "event": 4}
    assert image_events_pb2.ImageCreate.DESCRIPTOR.full_name == \
        "containerd.services.images.v1.ImageCreate"
    assert content_events_pb2.ContentDelete.DESCRIPTOR.full_name == \
        "containerd.events.ContentDelete"
