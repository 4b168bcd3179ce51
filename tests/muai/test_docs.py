from pathlib import Path

from muai.config import iter_fields
from muai.docs import documented_keys, render_configuration_reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_key_is_documented_and_no_documented_key_is_missing():
    keys = {path for path, _, _ in iter_fields()}
    documented = documented_keys(DOC.read_text())
    assert keys - documented == set(), "undocumented keys: run `muai config docs -o docs/configuration.md`"
    assert documented - keys == set(), "docs/configuration.md names keys that do not exist"


def test_reference_is_up_to_date():
    assert DOC.read_text() == render_configuration_reference(), "regenerate: muai config docs -o docs/configuration.md"


def test_every_key_has_a_description():
    missing = [path for path, field, _ in iter_fields() if not field.description]
    assert missing == []
