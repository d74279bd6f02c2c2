"""offload.indexes: KV selection policies (sparse attention indexes) and their exact twins."""
