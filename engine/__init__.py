"""idmesh core: identities, the DuckDB store, the identity graph and the IDSync service (no HTTP here)."""
