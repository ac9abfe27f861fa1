"""Webhook signatures against the reference implementation (the `standardwebhooks` package), both ways."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime

import pytest
import standardwebhooks

from kafscribe.webhooks import signing as webhooks

BODY = json.dumps({"type": "job.completed", "data": {"job_id": "j1"}}, separators=(",", ":")).encode()


def test_a_new_secret_has_the_standard_form_and_a_24_byte_key():
    secret = webhooks.new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 24
    assert webhooks.new_secret() != secret


def test_the_hmac_key_is_the_decoded_secret_not_its_text():
    key = b"\x01\x02 sixteen+ bytes of key"
    secret = "whsec_" + base64.b64encode(key).decode()
    expected = base64.b64encode(hmac.new(key, b"msg_1.1700000000." + BODY, hashlib.sha256).digest()).decode()
    assert webhooks.sign(secret, "msg_1", 1700000000, BODY) == "v1," + expected


def test_the_reference_library_verifies_our_deliveries():
    secret = webhooks.new_secret()
    headers = webhooks.headers(secret, "msg_abc", BODY)
    assert standardwebhooks.Webhook(secret).verify(BODY, headers) == json.loads(BODY)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(webhooks.new_secret()).verify(BODY, headers)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(BODY + b" ", headers)


def test_our_verify_accepts_what_the_reference_library_signs():
    secret = webhooks.new_secret()
    now = datetime.now(UTC)
    signature = standardwebhooks.Webhook(secret).sign("msg_ref", now, BODY.decode())
    headers = {"Webhook-Id": "msg_ref", "Webhook-Timestamp": str(int(now.timestamp())),
               "Webhook-Signature": signature}
    webhooks.verify(secret, headers, BODY)
    with pytest.raises(webhooks.WebhookVerificationError):
        webhooks.verify(webhooks.new_secret(), headers, BODY)
    with pytest.raises(webhooks.WebhookVerificationError):
        webhooks.verify(secret, headers, BODY.replace(b"j1", b"j2"))


def test_during_a_rotation_both_secrets_sign_and_either_verifies():
    old, new = webhooks.new_secret(), webhooks.new_secret()
    headers = webhooks.headers([new, old], "msg_rot", BODY)
    signatures = headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    for secret in (old, new):
        standardwebhooks.Webhook(secret).verify(BODY, headers)
        webhooks.verify(secret, headers, BODY)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(webhooks.new_secret()).verify(BODY, headers)


def test_stale_timestamps_and_missing_headers_are_refused():
    secret = webhooks.new_secret()
    stale = webhooks.headers(secret, "msg_old", BODY, timestamp=int(time.time()) - 3600)
    with pytest.raises(webhooks.WebhookVerificationError, match="tolerance"):
        webhooks.verify(secret, stale, BODY)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(BODY, stale)
    with pytest.raises(webhooks.WebhookVerificationError, match="missing"):
        webhooks.verify(secret, {"webhook-id": "x"}, BODY)


def test_an_unusable_secret_is_a_verification_error_not_a_crash():
    headers = webhooks.headers(webhooks.new_secret(), "msg_x", BODY)
    with pytest.raises(webhooks.WebhookVerificationError, match="unusable secret"):
        webhooks.verify("whsec_", headers, BODY)
