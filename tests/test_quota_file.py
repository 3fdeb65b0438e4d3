"""The quota file's errors name the line an operator must fix, and the watcher keeps the last good version."""

from __future__ import annotations

import os

import pytest

from splitspace.shared.config.quota_watch import QuotaWatcher
from splitspace.shared.contract.quotas import QuotaFileError, parse_quotas

DIGEST = "a" * 64

TWO_KEYS = f"""[tiers.pro]
weight = 4

[[keys]]
name = "one"
tier = "free"
sha256 = "{DIGEST}"

[[keys]]
name = "two"
tier = "free"
sha256 = "{DIGEST}"
"""


def error_of(text: str) -> str:
    with pytest.raises(QuotaFileError) as info:
        parse_quotas(text)
    return str(info.value)


def second_key(**fields: str) -> str:
    """TWO_KEYS with the second [[keys]] table's lines replaced (or extended) by ``fields``."""
    head, sep, table = TWO_KEYS.rpartition("[[keys]]\n")
    values = {"name": '"two"', "tier": '"free"', "sha256": f'"{DIGEST}"', **fields}
    return head + sep + "".join(f"{k} = {v}\n" for k, v in values.items())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (TWO_KEYS.replace("weight = 4", "wieght = 4"), "line 2: wieght: unknown key"),
        (second_key(tier='"nosuch"'), "line 11: tier: unknown tier 'nosuch'"),
        (second_key(name='"one"'), "line 10: name: duplicate key name 'one'"),
        (second_key(sha256='"xyz"'), "line 12: sha256: must be 64 hex digits"),
        (second_key(owner='"x"'), "line 13: owner: unknown key"),
    ],
)
def test_errors_name_the_line_even_in_a_later_keys_table(text, expected):
    assert error_of(text).startswith(expected), error_of(text)


def test_watcher_keeps_last_good_version_and_reports_the_error(tmp_path):
    path = tmp_path / "quotas.toml"
    path.write_text("[tiers.pro]\nmax_queued = 5\n")
    watcher = QuotaWatcher(path)
    assert watcher.current.tier("pro").max_queued == 5

    def rewrite(text: str) -> None:
        stamp = path.stat().st_mtime + 2
        path.write_text(text)
        os.utime(path, (stamp, stamp))

    rewrite("[tiers.pro]\nmax_queued = 6\n")
    assert watcher.check() and watcher.current.tier("pro").max_queued == 6
    rewrite("[tiers.pro]\nmax_queued = 7\nmax_queue = 1\n")
    assert not watcher.check()
    assert watcher.current.tier("pro").max_queued == 6
    assert watcher.last_error and watcher.last_error.startswith("line 3: max_queue: unknown key")
    assert not watcher.check()  # unchanged file: nothing new, the error stays
    assert watcher.last_error
    rewrite("[tiers.pro]\nmax_queued = 8\n")
    assert watcher.check() and watcher.current.tier("pro").max_queued == 8
    assert watcher.last_error is None


def test_a_keys_webhook_secret_is_checked() -> None:
    good = "whsec_" + __import__("base64").b64encode(b"x" * 32).decode()
    config = parse_quotas(second_key(webhook_secret=f'"{good}"'))
    assert config.webhook_secret("key:two") == good and config.webhook_secret("key:one") is None
    assert good not in repr(config.keys[1]), "never in a repr"
    for bad, reason in (
        ('"nope"', "whsec_"),
        ('"whsec_!!"', "base64"),
        ('"whsec_YWJj"', "24 to 64 bytes"),
        ("3", "text"),
    ):
        message = error_of(second_key(webhook_secret=bad))
        assert "webhook_secret" in message and reason in message and "line 13" in message, message
