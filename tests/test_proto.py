"""The committed gRPC modules must be what `python -m proto.generate` writes today."""

from pathlib import Path

from proto.generate import PROTO_DIR, generate


def test_generated_modules_are_fresh(tmp_path: Path):
    for fresh in generate(tmp_path):
        committed = PROTO_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.name} is stale: run `make proto` and commit the result"
        )
