"""API keys: ``rd_<prefix8>_<secret>``. Only a sha256 of the whole key is stored, so a leaked
database does not leak usable keys; the prefix identifies a key in listings and revocations."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "rd_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new key and its public prefix."""
    prefix = secrets.token_hex(4)
    return f"{KEY_PREFIX}{prefix}_{secrets.token_hex(24)}", prefix


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(sa.select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, tenant_name: str) -> str:
    """Create a key for the tenant (creating the tenant if new); the caller commits. Returns the key."""
    tenant = get_or_create_tenant(session, tenant_name)
    key, prefix = generate_key()
    session.add(ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=hash_key(key)))
    session.flush()
    return key


def revoke_api_key(session: Session, prefix: str) -> int:
    """Revoke every live key with this prefix; returns how many were revoked."""
    keys = session.scalars(sa.select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None)))
    count = 0
    for key in keys:
        key.revoked_at = utcnow()
        count += 1
    return count


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    """The tenant owning a live key, or None for an unknown, malformed or revoked key."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    digest = hash_key(key)
    row = session.execute(
        sa.select(ApiKey, Tenant)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
    ).first()
    if row is None or not hmac.compare_digest(row.ApiKey.key_hash, digest):
        return None
    return row.Tenant


def ensure_dev_key(session: Session, var_dir: Path) -> str | None:
    """Embedded mode: when no key exists at all, create one for a 'dev' tenant and write it to
    ``<var>/dev-api-key``. Returns the new key, or None when keys already existed."""
    if session.scalar(sa.select(sa.func.count()).select_from(ApiKey)):
        return None
    key = create_api_key(session, "dev")
    session.commit()
    var_dir.mkdir(parents=True, exist_ok=True)
    path = var_dir / "dev-api-key"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key
