"""Where series come from: the contract (base), NBIA, IDC, and --mode auto."""
