import hashlib

import pytest

from gateway.auth import Client, KeyStore, hash_key, presented_key
from gateway.errors import ConfigError, Unauthenticated


def _store() -> KeyStore:
    return KeyStore.from_mapping({
        "admin_token_sha256": hash_key("admin-token"),
        "clients": [
            {"id": "alice", "key_sha256": hash_key("alice-key")},
            {"id": "alice", "key_sha256": hash_key("alice-rotated-key"), "tier": "standard"},
            {"id": "bob", "key_sha256": hash_key("bob-key").upper(), "tier": "premium"},
        ],
    })


def test_hash_is_sha256_hex() -> None:
    assert hash_key("abc") == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize(
    ("metadata", "client"),
    [
        ([("authorization", "Bearer alice-key")], Client("alice")),
        ([("authorization", "bearer alice-rotated-key")], Client("alice")),
        ([("x-api-key", "bob-key")], Client("bob", "premium")),
        ([("x-api-key", "bob-key"), ("authorization", "Bearer alice-key")], Client("alice")),
    ],
)
def test_key_from_either_header_maps_to_client(metadata, client: Client) -> None:
    assert _store().authenticate(metadata) == client


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ([], "missing API key"),
        ([("authorization", "Basic alice-key")], "missing API key"),
        ([("authorization", "Bearer ")], "missing API key"),
        ([("x-api-key", "mallory-key")], "invalid API key"),
        ([("authorization", "Bearer " + hash_key("alice-key"))], "invalid API key"),
    ],
)
def test_missing_or_wrong_key_is_unauthenticated(metadata, message: str) -> None:
    with pytest.raises(Unauthenticated, match=message):
        _store().authenticate(metadata)


def test_admin_token() -> None:
    store = _store()
    store.check_admin([("authorization", "Bearer admin-token")])
    with pytest.raises(Unauthenticated, match="invalid admin token"):
        store.check_admin([("authorization", "Bearer alice-key")])
    with pytest.raises(Unauthenticated, match="missing admin token"):
        store.check_admin([])


def test_clients_are_listed_once_each() -> None:
    assert [c.id for c in _store().clients] == ["alice", "bob"]


def test_presented_key_ignores_binary_metadata() -> None:
    assert presented_key([("x-api-key-bin", b"k"), ("x-api-key", "k")]) == "k"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"clients": [{"id": "a", "key_sha256": "short"}]}, "keys: clients[0].key_sha256"),
        ({"clients": [{"id": "", "key_sha256": hash_key("k")}]}, "keys: clients[0].id"),
        ({"clients": [{"id": "a", "key": "plaintext"}]}, "keys: clients[0].key"),
        ({"clients": [{"id": "a", "key_sha256": hash_key("k")}, {"id": "b", "key_sha256": hash_key("k")}]},
         "keys: clients[1].key_sha256"),
        ({"clients": "alice"}, "keys: clients"),
        ({"admin_token_sha256": "x", "clients": []}, "keys: admin_token_sha256"),
        ({"users": []}, "keys: users"),
    ],
)
def test_bad_keys_file_names_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        KeyStore.from_mapping(data)
    assert caught.value.field == field
