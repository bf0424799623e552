#!/usr/bin/env python3
"""Test vectors for the schemes and presets of SPEC 6.2, made by independent implementations.

Re-run (from the repo root):

    python3 -m venv /tmp/vecenv2
    /tmp/vecenv2/bin/pip install slack_sdk==3.48.0 cryptography==50.0.2 standardwebhooks==1.1.0
    /tmp/vecenv2/bin/python tests/vectors/generate_schemes.py

Writes schemes.json next to this file; deterministic (fixed keys, ids and timestamps).
Each vector carries the source's configuration keys as sprintlink reads them ("source"), the
request (headers, query, body) and the time at which it is to be verified.

Provenance per scheme:
  * slack: `slack_sdk.signature.SignatureVerifier.generate_signature`, re-checked with
    `SignatureVerifier.is_valid` (its clock pinned to the vector's timestamp).
  * standard-webhooks v1a (Ed25519): `cryptography`'s Ed25519 (OpenSSL), an implementation other
    than ours (ed25519-dalek), signing "{id}.{timestamp}.{body}" and re-checked with its verify;
    the v1 entries of the mixed vector come from the `standardwebhooks` reference library.
  * shopify, woocommerce, typeform: no provider library on PyPI; each provider documents the
    computation (Shopify: base64 HMAC-SHA256 of the raw body in X-Shopify-Hmac-Sha256;
    WooCommerce: base64_encode(hash_hmac('sha256', $payload, $secret, true)) in
    X-WC-Webhook-Signature; Typeform: "sha256=" + base64 HMAC-SHA256 in Typeform-Signature),
    computed here with Python's stdlib hmac/hashlib/base64.
  * hmac (generic sha1 / sha512, templates, query signature), token, basic: stdlib.
"""

import base64
import hashlib
import hmac
import json
import os
import platform
from datetime import datetime, timezone
from importlib.metadata import version

import standardwebhooks.webhooks as swh
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization
from slack_sdk.signature import SignatureVerifier

SLACK_VER = f"slack_sdk=={version('slack_sdk')}"
CRYPTO_VER = f"cryptography=={version('cryptography')}"
SWH_VER = f"standardwebhooks=={version('standardwebhooks')}"
PY_VER = f"python=={platform.python_version()}"

vectors = []


def add(name, source, secrets, body, headers, timestamp, produced_by, query=None):
    vectors.append({
        "name": name,
        "source": dict(source, secrets=secrets),
        "body": body,
        "headers": headers,
        "query": query,
        "timestamp": timestamp,
        "produced_by": produced_by,
    })


def b64(b):
    return base64.b64encode(b).decode()


def hmac_b64(secret, body, alg=hashlib.sha256):
    return b64(hmac.new(secret.encode(), body.encode(), alg).digest())


# ---------------------------------------------------------------- slack

class PinnedClock:
    def __init__(self, ts):
        self.ts = ts

    def now(self):
        return float(self.ts)


slack_secret = "8f742231b10e8888abcd99yyyzzz85a5"  # the example signing secret of Slack's docs
slack_ts = 1531420618
slack_body = ('{"token":"Jhj5dZrVaK7ZwHHjRyZWjbDl","team_id":"T0001","api_app_id":"A0001",'
              '"event":{"type":"app_mention","user":"U0001","text":"<@U0002> order 5001",'
              '"ts":"1531420618.000200","channel":"C0001"},"type":"event_callback",'
              '"event_id":"Ev0001ABCD","event_time":1531420618}')
sv = SignatureVerifier(slack_secret, clock=PinnedClock(slack_ts))
sig = sv.generate_signature(timestamp=str(slack_ts), body=slack_body)
assert sv.is_valid(body=slack_body, timestamp=str(slack_ts), signature=sig)
assert not sv.is_valid(body=slack_body + " ", timestamp=str(slack_ts), signature=sig)
add("slack events api", {"scheme": "slack"}, [slack_secret], slack_body,
    {"X-Slack-Request-Timestamp": str(slack_ts), "X-Slack-Signature": sig}, slack_ts,
    f"{SLACK_VER}: SignatureVerifier.generate_signature, checked with is_valid")

# The slash-command example of Slack's "Verifying requests from Slack" page (a form body).
form_body = ("token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&"
             "channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&"
             "command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2F"
             "commands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&"
             "trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c")
sig = sv.generate_signature(timestamp=str(slack_ts), body=form_body)
assert sig == "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503", sig
assert sv.is_valid(body=form_body, timestamp=str(slack_ts), signature=sig)
add("slack slash command (Slack's documented example)", {"scheme": "slack"}, [slack_secret],
    form_body, {"X-Slack-Request-Timestamp": str(slack_ts), "X-Slack-Signature": sig}, slack_ts,
    f"{SLACK_VER}: SignatureVerifier.generate_signature; equals the signature Slack's docs publish")

# ---------------------------------------------------------------- standard webhooks v1a

def ed_key(seed):
    sk = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest())
    pk = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sk, "whpk_" + b64(pk)


def v1a(sk, msg_id, ts, body):
    content = f"{msg_id}.{ts}.{body}".encode()
    sig = sk.sign(content)
    sk.public_key().verify(sig, content)  # raises when wrong
    try:
        sk.public_key().verify(sig, content + b" ")
    except Exception:
        pass
    else:
        raise AssertionError("ed25519 accepted a tampered body")
    return "v1a," + b64(sig)


sk1, pk1 = ed_key(b"sprintlink ed25519 vector key 1")
sk2, pk2 = ed_key(b"sprintlink ed25519 vector key 2 (retired)")
body_e = '{"id":"evt_ed_1","type":"object.created","data":{"object_id":777,"lead_id":8473}}'
mid, ts = "msg_ed25519_0001", 1700000000
add("v1a", {"scheme": "standard-webhooks"}, [pk1], body_e,
    {"webhook-id": mid, "webhook-timestamp": str(ts), "webhook-signature": v1a(sk1, mid, ts, body_e)},
    ts, f"{CRYPTO_VER}: Ed25519PrivateKey.sign over id.timestamp.body, checked with verify")

# Rotation: two public keys configured; the header carries the retired key's entry and the new one.
mid, ts = "msg_ed25519_0002", 1700000300
add("v1a rotation", {"scheme": "standard-webhooks"}, [pk2, pk1], body_e,
    {"webhook-id": mid, "webhook-timestamp": str(ts),
     "webhook-signature": v1a(sk2, mid, ts, body_e) + " " + v1a(sk1, mid, ts, body_e)},
    ts, f"{CRYPTO_VER}: Ed25519 x2 (two keys), joined with a space")

# Mixed: a whsec_ secret and a whpk_ key on one source; v1 from the reference library + v1a.
whsec = "whsec_" + b64(b"sprintlink-mixed-hmac-key-01234")
mid, ts = "msg_mixed_0003", 1700000600
v1 = swh.Webhook(whsec).sign(msg_id=mid, timestamp=datetime.fromtimestamp(ts, tz=timezone.utc), data=body_e)
add("v1 + v1a mixed, v1a entry only", {"scheme": "standard-webhooks"}, [whsec, pk1], body_e,
    {"webhook-id": mid, "webhook-timestamp": str(ts), "webhook-signature": v1a(sk1, mid, ts, body_e)},
    ts, f"{CRYPTO_VER}: Ed25519; the source also holds a whsec_ secret")
add("v1 + v1a mixed, v1 entry only", {"scheme": "standard-webhooks"}, [whsec, pk1], body_e,
    {"webhook-id": mid, "webhook-timestamp": str(ts), "webhook-signature": v1},
    ts, f"{SWH_VER}: Webhook.sign; the source also holds a whpk_ key")

# ---------------------------------------------------------------- shopify, woocommerce, typeform

shop_secret = "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"
shop_body = ('{"id":820982911946154508,"email":"jon@example.com","created_at":"2026-12-01T10:00:00-05:00",'
             '"total_price":"199.00","currency":"USD","customer":{"id":115310627314723954,'
             '"email":"jon@example.com","first_name":"Jon"},"line_items":[{"id":866550311766439020,'
             '"title":"Sprint shoes","quantity":1,"price":"199.00"}]}')
add("shopify orders/create", {"scheme": "shopify"}, [shop_secret], shop_body,
    {"X-Shopify-Hmac-Sha256": hmac_b64(shop_secret, shop_body), "X-Shopify-Topic": "orders/create",
     "X-Shopify-Webhook-Id": "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043",
     "X-Shopify-Shop-Domain": "sprint-shop.myshopify.com"}, 1700000000,
    f"{PY_VER}: hmac.new(secret, body, sha256) base64 (Shopify's documented computation)")

wc_secret = "wc-webhook-secret-5b2e9a7d41"
wc_body = ('{"id":727,"parent_id":0,"status":"processing","currency":"EUR","total":"42.00",'
           '"billing":{"first_name":"Zoë","email":"zoe@example.com"},"customer_id":3}')
add("woocommerce order.created", {"scheme": "woocommerce"}, [wc_secret], wc_body,
    {"X-WC-Webhook-Signature": hmac_b64(wc_secret, wc_body), "X-WC-Webhook-Topic": "order.created",
     "X-WC-Webhook-Delivery-ID": "a1b2c3d4e5", "X-WC-Webhook-ID": "12",
     "X-WC-Webhook-Source": "https://shop.example.com/"}, 1700000000,
    f"{PY_VER}: hmac.new(secret, body, sha256) base64 (WooCommerce's base64_encode(hash_hmac(..., true)))")

tf_secret = "typeform-secret-9f8e7d6c5b4a"
tf_body = ('{"event_id":"01HZX0EVENT","event_type":"form_response","form_response":{"form_id":"lT4Z3j",'
           '"token":"a3a12ec67a1365927098a606107fac15","submitted_at":"2026-12-01T10:00:00Z",'
           '"answers":[{"type":"email","email":"ana@example.com","field":{"id":"eml","type":"email"}}]}}')
add("typeform form_response", {"scheme": "typeform"}, [tf_secret], tf_body,
    {"Typeform-Signature": "sha256=" + hmac_b64(tf_secret, tf_body)}, 1700000000,
    f"{PY_VER}: 'sha256=' + base64 hmac sha256 (Typeform's documented computation)")

# ---------------------------------------------------------------- generic hmac

g_secret = "generic-hmac-secret-0a1b2c3d"
g_body = '{"id":"evt_g1","type":"object.created","data":{"object_id":9,"lead_id":10}}'
add("hmac sha1 hex", {"scheme": "hmac", "algorithm": "sha1", "signature_header": "X-Hub-Signature",
                      "prefix": "sha1="}, [g_secret], g_body,
    {"X-Hub-Signature": "sha1=" + hmac.new(g_secret.encode(), g_body.encode(), hashlib.sha1).hexdigest()},
    1700000000, f"{PY_VER}: hmac sha1 hexdigest")
ts_ms = 1700000000123
content = f"{ts_ms}.{g_body}"
add("hmac sha512 base64, ms timestamp template", {
        "scheme": "hmac", "algorithm": "sha512", "signature_header": "X-Signature", "encoding": "base64",
        "signed_content": "{timestamp}.{body}", "timestamp_header": "X-Timestamp", "timestamp_unit": "ms"},
    [g_secret], g_body,
    {"X-Signature": hmac_b64(g_secret, content, hashlib.sha512), "X-Timestamp": str(ts_ms)},
    1700000000, f"{PY_VER}: hmac sha512 base64 over '{{timestamp}}.{{body}}'")
content = f"req-42:{g_body}"
add("hmac sha256 header template, signature in the query", {
        "scheme": "hmac", "signature_query": "sig", "signed_content": "{header:X-Request-Id}:{body}"},
    [g_secret], g_body, {"X-Request-Id": "req-42"}, 1700000000,
    f"{PY_VER}: hmac sha256 hexdigest over '{{header:X-Request-Id}}:{{body}}'",
    query="sig=" + hmac.new(g_secret.encode(), content.encode(), hashlib.sha256).hexdigest())

# ---------------------------------------------------------------- token, basic

hot_body = ('{"id":"b1d9c9a2-hotmart-0001","creation_date":1700000000000,"event":"PURCHASE_APPROVED",'
            '"version":"2.0.0","data":{"product":{"id":0,"name":"Curso"},"buyer":{"email":"b@example.com"}}}')
add("hotmart PURCHASE_APPROVED", {"scheme": "hotmart"}, ["hottok-2f9a61c0e4d3b8a7"], hot_body,
    {"X-HOTMART-HOTTOK": "hottok-2f9a61c0e4d3b8a7"}, 1700000000, "Hotmart sends the hottok as is")
add("basic", {"scheme": "basic"}, ["erp-sender:pa55-w0rd-Long"], g_body,
    {"Authorization": "Basic " + b64(b"erp-sender:pa55-w0rd-Long")}, 1700000000,
    f"{PY_VER}: base64.b64encode(b'user:password') (RFC 7617)")

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemes.json")
with open(out, "w", encoding="utf-8") as f:
    json.dump(vectors, f, indent=2, ensure_ascii=False)
    f.write("\n")
print(f"wrote {len(vectors)} vectors to {out}")
