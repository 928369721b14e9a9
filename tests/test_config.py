"""Config's docstring is the reference for its fields: every field is documented there, with its
type, default, allowed values and the defaults that other modules hold, and help() shows it."""
import dataclasses
import inspect
import pydoc
import re

import pytest

from fedxray.config import (DATASET_DEFAULTS, FEATURE_DTYPES, RUNTIME_FIELDS, STRATEGY_FIELDS, Config)
from fedxray.client import OPTIMIZERS
from fedxray.device import AMP_MODES
from fedxray.model import LOCAL_KEY_GROUPS
from fedxray.partition import SCHEMES
from fedxray.strategies import STRATEGIES

FIELDS = dataclasses.fields(Config)
ENTRY = re.compile(r"^(\s*)([A-Za-z_]\w*) : (.+)$")   # numpy style: "name : type, default value"


def doc_entries() -> dict[str, tuple[str, str]]:
    """name -> (the entry line after "name : ", its description as one line): the description is
    the lines indented under the entry, up to the next blank or less indented line."""
    lines = inspect.cleandoc(Config.__doc__ or "").splitlines()
    entries = {}
    for i, line in enumerate(lines):
        m = ENTRY.match(line)
        if not m:
            continue
        indent, name, header = len(m.group(1)), m.group(2), m.group(3)
        body = []
        for following in lines[i + 1:]:
            if not following.strip() or len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following.strip())
        assert name not in entries, f"{name} is documented twice"
        entries[name] = (header, " ".join(body))
    return entries


def doc_type(annotation: str) -> str:
    """The docstring's spelling of a field's annotation: Optional[str] -> "str or None"."""
    return re.sub(r"^Optional\[(\w+)\]$", r"\1 or None", annotation)


def test_every_field_and_nothing_else_has_an_entry_with_a_description():
    entries = doc_entries()
    assert set(entries) == {f.name for f in FIELDS}
    assert [n for n in entries] == [f.name for f in FIELDS]   # in the order of the fields
    empty = [name for name, (_, description) in entries.items() if not description]
    assert not empty, f"entries without a description: {empty}"


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_entry_states_the_type_and_default(field):
    header, _ = doc_entries()[field.name]
    assert header == f"{doc_type(field.type)}, default {field.default!r}"


def test_help_shows_the_docstring():
    doc = inspect.cleandoc(Config.__doc__ or "")
    assert not doc.startswith("Config(")   # dataclass's stand-in when a class has no docstring
    rendered = pydoc.plain(pydoc.render_doc(Config))
    missing = [line.strip() for line in doc.splitlines() if line.strip() and line.strip() not in rendered]
    assert "Attributes" in rendered and not missing, f"help(Config) lacks {missing[:3]}"


def test_the_introduction_names_the_rules_of_construction():
    intro = inspect.cleandoc(Config.__doc__ or "").split("Attributes")[0]
    for word in ("Config.for_dataset", "DATASET_DEFAULTS", "RUNTIME_FIELDS", "with_strategy", *RUNTIME_FIELDS,
                 *DATASET_DEFAULTS["nih"]):
        assert word in intro


@pytest.mark.parametrize("name, allowed", [("optimizer", OPTIMIZERS), ("amp", AMP_MODES),
                                           ("local_keys", LOCAL_KEY_GROUPS), ("feature_dtype", FEATURE_DTYPES),
                                           ("partition", SCHEMES), ("strategy", tuple(STRATEGIES))])
def test_entry_lists_every_allowed_value(name, allowed):
    _, description = doc_entries()[name]
    assert [v for v in allowed if f'"{v}"' not in description] == []


@pytest.mark.parametrize("name", STRATEGY_FIELDS)
def test_strategy_hyperparameter_entry_names_its_strategies_and_their_defaults(name):
    _, description = doc_entries()[name]
    users = {cls.name: cls.defaults[name] for cls in STRATEGIES.values() if name in cls.defaults}
    assert users, f"no strategy uses {name}"
    missing = [f"{s} {v!r}" for s, v in users.items() if f"{s} {v!r}" not in description]
    assert not missing, f"{name}'s entry lacks the defaults {missing}"
    others = [s for s in STRATEGIES if s not in users and re.search(rf"\b{s}\b", description)]
    assert not others, f"{name}'s entry names strategies that do not use it: {others}"


@pytest.mark.parametrize("name", sorted(DATASET_DEFAULTS["nih"]))
def test_dataset_default_entry_gives_each_dataset_value(name):
    _, description = doc_entries()[name]
    assert "DATASET_DEFAULTS" in description
    for dataset, defaults in DATASET_DEFAULTS.items():
        assert f'"{dataset}" {defaults[name]!r}' in description


def test_runtime_fields_are_the_entries_that_say_so():
    marked = {name for name, (_, description) in doc_entries().items() if "RUNTIME_FIELDS" in description}
    assert marked == set(RUNTIME_FIELDS)


@pytest.mark.parametrize("fields, message", [
    ({"min_client_patients": -1}, "min_client_patients must be an integer >= 0, got -1"),
    ({"min_client_patients": 2.5}, "min_client_patients must be an integer >= 0, got 2.5"),
    ({"min_client_images": True}, "min_client_images must be an integer >= 0, got True"),
    ({"min_client_images": "10"}, "min_client_images must be an integer >= 0, got '10'"),
    ({"balanced_sizes": 1}, "balanced_sizes must be True or False, got 1"),
])
def test_partition_size_fields_are_checked(fields, message):
    with pytest.raises(ValueError, match=re.escape(f"Config: {message}")):
        Config(**fields)
    valid = Config(min_client_patients=0, min_client_images=500, balanced_sizes=True, partition="dirichlet")
    assert Config.from_dict(valid.to_dict()) == valid


def test_local_keys_takes_each_group_once_in_one_spelling():
    assert Config(local_keys="bn,fc").local_keys == "bn,fc"
    for bad, message in (("fc,bn", "write it 'bn,fc'"), ("bn,bn", "write it 'bn'"), ("head", "unknown group 'head'"),
                         (" fc", "unknown group ' fc'"), (None, "must be a string")):
        with pytest.raises(ValueError, match=message):
            Config(local_keys=bad)


def test_a_config_file_written_with_bn_policy_is_read_as_local_keys():
    old = {k: v for k, v in Config().to_dict().items() if k not in ("local_keys", "site_test_fraction")}
    assert Config.from_dict({**old, "bn_policy": "local"}) == Config(local_keys="bn")
    assert Config.from_dict({**old, "bn_policy": "average"}) == Config()
    with pytest.raises(ValueError, match="bn_policy 'both' is none of"):
        Config.from_dict({**old, "bn_policy": "both"})


@pytest.mark.parametrize("value", [-0.1, 1.0, "0.2", True])
def test_site_test_fraction_must_lie_in_zero_to_one(value):
    with pytest.raises(ValueError, match="site_test_fraction must be a number in"):
        Config(site_test_fraction=value)
