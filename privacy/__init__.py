"""Privacy building blocks: DP-SGD glue (Opacus), the department budget ledger and policy."""
