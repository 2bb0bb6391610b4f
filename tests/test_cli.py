"""Bad paths and bad settings: one clear line, a non-zero exit, no traceback, and no Spark start."""
import os
import shutil

import pytest

import etl
from conftest import SAMPLE

pytestmark = pytest.mark.check  # `make check`: the command line and settings


def assert_one_line_error(result, *fragments, status=2):
    lines = result.stderr.strip().splitlines()
    # One line and nothing else also proves Spark never started: its JVM always says something.
    assert result.returncode == status and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert str(fragment) in lines[0]
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr


def test_missing_input_root(run_etl, tmp_path):
    missing = tmp_path / "nowhere"
    assert_one_line_error(run_etl("--input", missing, "--output", tmp_path / "out"), "input root not found", missing)


def test_input_root_without_song_data(run_etl, tmp_path):
    (tmp_path / "in" / "log_data").mkdir(parents=True)
    result = run_etl("--input", tmp_path / "in", "--output", tmp_path / "out")
    assert_one_line_error(result, "no song_data/ folder", tmp_path / "in")


def test_input_root_without_json_files(run_etl, tmp_path):
    root = tmp_path / "in"
    shutil.copytree(SAMPLE / "log_data", root / "log_data")
    (root / "song_data" / "A").mkdir(parents=True)
    (root / "song_data" / "A" / "notes.txt").write_text("x")
    (root / "song_data" / "A" / ".hidden.json").write_text("{}")
    result = run_etl("--input", root, "--output", tmp_path / "out")
    assert_one_line_error(result, "no .json files under", root / "song_data")


def test_output_path_that_cannot_be_created(run_etl, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run_etl("--input", SAMPLE, "--output", blocker / "out")
    assert_one_line_error(result, "cannot create output folder", blocker / "out")


def test_unknown_command_line_option(run_etl, tmp_path):
    assert_one_line_error(run_etl("--inptu", SAMPLE), "unrecognized arguments: --inptu")


def test_missing_config_file(run_etl, tmp_path):
    missing = tmp_path / "nope.cfg"
    assert_one_line_error(run_etl(config=missing), "cannot read config", missing)


def test_unreadable_config_file(run_etl, tmp_path):
    folder = tmp_path / "dl.cfg"
    folder.mkdir()
    assert_one_line_error(run_etl(config=folder), "cannot read config", folder)


@pytest.mark.parametrize("text, fragment", [
    ("AWS_SECRET_ACCESS_KEY = hunter2-secret\n", "line 1 is not under a [section]"),
    ("[AWS]\nAWS_SECRET_ACCESS_KEY hunter2-secret\n", "cannot parse line 2"),
    ("[AWS]\nREGION = a\nREGION = b\n", "DuplicateOptionError"),
], ids=["no-section", "no-equals", "duplicate-key"])
def test_malformed_config_names_the_file_and_never_echoes_a_secret(run_etl, tmp_path, text, fragment):
    config = tmp_path / "dl.cfg"
    config.write_text(text)
    result = run_etl(config=config)
    assert_one_line_error(result, "malformed config", config, fragment)
    assert "hunter2" not in result.stderr


def test_unknown_key_in_config(run_etl, tmp_path):
    config = tmp_path / "dl.cfg"
    config.write_text("[PATHS]\nINPUT_DTA = data\n")
    assert_one_line_error(run_etl(config=config), "unknown key INPUT_DTA in [PATHS]", config)


def test_unknown_section_in_config(run_etl, tmp_path):
    config = tmp_path / "dl.cfg"
    config.write_text("[PATH]\nINPUT_DATA = data\n")
    assert_one_line_error(run_etl(config=config), "unknown section [PATH]", config)


def _settings(argv, environ, config_text=None, tmp_path=None):
    if config_text is not None:
        path = tmp_path / "dl.cfg"
        path.write_text(config_text)
        argv = ["--config", str(path), *argv]
    return etl.resolve_settings(etl.parse_args(argv), environ)


def test_path_precedence_is_flag_then_environment_then_config(tmp_path):
    config = "[PATHS]\nINPUT_DATA = /from/config\nOUTPUT_DATA = s3://bucket/from-config/\n"
    from_config = _settings([], {}, config, tmp_path)
    assert (from_config.input_root, from_config.output_root) == ("/from/config", "s3://bucket/from-config")
    from_env = _settings([], {"INPUT_DATA": "/from/env"}, config, tmp_path)
    assert from_env.input_root == "/from/env"
    from_flag = _settings(["--input", "/from/flag"], {"INPUT_DATA": "/from/env"}, config, tmp_path)
    assert from_flag.input_root == "/from/flag"
    assert from_flag.rejected_root == "s3://bucket/from-config/_rejected"


def test_defaults_are_the_bundled_sample_and_local_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = _settings([], {}, "[PATHS]\nINPUT_DATA =\n", tmp_path)
    assert settings.input_root == str(SAMPLE)
    assert settings.output_root == os.path.join(str(tmp_path), "output")


def test_settings_never_show_secrets(tmp_path):
    config = "[AWS]\nAWS_ACCESS_KEY_ID = AKIAX\nAWS_SECRET_ACCESS_KEY = hunter2-secret\n"
    settings = _settings([], {"AWS_SECRET_ACCESS_KEY": "from-env"}, config, tmp_path)
    assert settings.aws.secret_key == "hunter2-secret" and settings.aws.source == "dl.cfg"
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings)


def test_half_a_key_pair_is_an_error(run_etl, tmp_path):
    config = tmp_path / "dl.cfg"
    config.write_text("[AWS]\nAWS_SECRET_ACCESS_KEY = hunter2-secret\n")
    result = run_etl("--output", "s3://lake/x", config=config)
    assert_one_line_error(result, "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together (dl.cfg has only one)")
    assert "hunter2" not in result.stderr


def test_layout_can_change_partition_columns(tmp_path):
    settings = _settings([], {}, "[LAYOUT]\nSONGS_PARTITION_BY = year\nTIME_PARTITION_BY = none\n", tmp_path)
    assert settings.partition_by == {**etl.PARTITION_BY, "songs": ("year",), "time": ()}


def test_layout_naming_an_unknown_column_is_an_error(run_etl, tmp_path):
    config = tmp_path / "dl.cfg"
    config.write_text("[LAYOUT]\nSONGS_PARTITION_BY = year, artist\n")
    assert_one_line_error(run_etl(config=config), "SONGS_PARTITION_BY", "names artist, which is not a column of songs")


def test_no_java_is_one_clear_line(run_etl, tmp_path):
    result = run_etl("--input", SAMPLE, "--output", tmp_path / "out",
                     env={"JAVA_HOME": str(tmp_path / "no-jdk"), "PATH": os.path.dirname(os.sys.executable)})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot start Spark: ")
    assert "Traceback" not in result.stderr
