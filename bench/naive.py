"""The naive baseline: the queue function a blog post teaches, written carefully but in that shape.

Per message: ``requests.post`` to the Entra token endpoint, ``requests.get`` of the actor in
``systemusers`` by email, ``requests.patch`` of the record with ``MSCRMCallerID``.  No session
(every call opens its own TLS connection), no token cache, no user cache, no retry: a failure
raises and the queue redelivers the message.  It is not a strawman: values are OData-escaped and
URL-quoted, every status code is checked, a missing user is an error, and the client secret is
read once from an environment variable, as such posts do (the project reads it from Key Vault).
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

import azure.functions as func
import requests

DATAVERSE_URL = os.environ["DATAVERSE_URL"].rstrip("/")
TENANT_ID = os.environ["DATAVERSE_TENANT_ID"]
CLIENT_ID = os.environ["DATAVERSE_CLIENT_ID"]
CLIENT_SECRET = os.environ["DATAVERSE_CLIENT_SECRET"]
AUTHORITY = os.environ.get("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com").rstrip("/")
API = f"{DATAVERSE_URL}/api/data/v9.2"
TIMEOUT = 30


def literal(value: str) -> str:
    """An OData string literal, URL-quoted: ``'o''brien%40contoso.com'``."""
    return "'" + quote(value.replace("'", "''"), safe="") + "'"


def get_token() -> str:
    response = requests.post(
        f"{AUTHORITY}/{TENANT_ID}/oauth2/v2.0/token",
        data={
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "grant_type": "client_credentials",
            "scope": f"{DATAVERSE_URL}/.default",
        },
        timeout=TIMEOUT,
    )
    response.raise_for_status()
    token: str = response.json()["access_token"]
    return token


def headers(token: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json",
        "OData-MaxVersion": "4.0",
        "OData-Version": "4.0",
    }


def find_user(token: str, email: str) -> str:
    response = requests.get(
        f"{API}/systemusers?$select=systemuserid&$filter=internalemailaddress%20eq%20{literal(email)}",
        headers=headers(token),
        timeout=TIMEOUT,
    )
    response.raise_for_status()
    users = response.json()["value"]
    if len(users) != 1:
        raise ValueError(f"expected one user with email {email}, found {len(users)}")
    user_id: str = users[0]["systemuserid"]
    return user_id


def key_segment(key: str | dict[str, Any]) -> str:
    if isinstance(key, str):
        return key
    return ",".join(f"{name}={literal(str(value))}" for name, value in key.items())


def main(msg: func.QueueMessage) -> None:
    job = json.loads(msg.get_body())
    token = get_token()
    extra: dict[str, str] = {}
    act_as = job.get("actAs")
    if act_as:
        extra["MSCRMCallerID"] = find_user(token, act_as["email"])
    response = requests.patch(
        f"{API}/{job['entity']}({key_segment(job['key'])})",
        json=job["data"],
        headers={**headers(token), **extra},
        timeout=TIMEOUT,
    )
    response.raise_for_status()
