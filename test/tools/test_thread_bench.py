"""The thread benchmark refuses what it cannot measure with one line, before any timing."""
import pytest

from clustvit_ros.tools import thread_bench


def test_thread_bench_names_bad_data_and_a_bad_model(tmp_path, capsys):
    assert thread_bench.main(["--data", str(tmp_path / "absent")]) == 2
    error = capsys.readouterr().err
    assert "absent" in error and "Traceback" not in error
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    assert thread_bench.main(["--model", str(broken), "--data", str(tmp_path)]) == 2
    assert "broken.safetensors" in capsys.readouterr().err


def test_thread_bench_needs_a_frame_to_time(capsys):
    with pytest.raises(SystemExit) as stop:
        thread_bench.main(["--data", "unused", "--limit", "0"])
    assert stop.value.code == 2 and "--limit" in capsys.readouterr().err
