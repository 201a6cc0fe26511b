"""Loading PEFT adapters at the adapter's cost, failing closed: the machinery behind `fastkeys.peft`.

Imports run one way, down this list; only `api` is called from outside (by `fastkeys.peft`), and
`result` is the one module that imports neither torch nor peft.

| module        | holds |
|---------------|-------|
| `api`         | `load_one`, `load_many`, `from_pretrained`: reading, routing, the transaction |
| `lifecycle`   | `set_adapter`, `delete_adapters` at the cost of the layers involved |
| `fallback`    | PEFT's own loader, fed the checked tensors, base-weight writes guarded |
| `inject`      | the fast path: one adapter, only its modules |
| `leaves`      | LoRA's Linear/Identity leaves as torch's constructors leave them, without their cost |
| `methods`     | one record per method on the fast path (LoRA, LoHa, LoKr, IA3, HRA, OFT) |
| `plan`        | targets (PEFT's matcher) and the checks made before the model changes |
| `policy`      | the allow-list: config fields, options, model states the fast path reproduces |
| `index`       | the model as PEFT's matcher sees it, read afresh per load |
| `transaction` | record, roll back (values, modules, flags, RNG), Ctrl-C deferred while restoring |
| `peft_re`     | PEFT's regular-expression matching on fastkeys' linear-time engine |
| `files`       | reading tensors through the checks `scan` made |
| `boundary`    | the private PEFT and torch symbols used, the version gate, PEFT's hooks (via `recorder`) |
| `result`      | `AdapterLoadResult` |
"""
