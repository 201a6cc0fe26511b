"""What fastkeys does inside other libraries' loaders. The public modules are `fastkeys.peft`,
`fastkeys.transformers` and `fastkeys.diffusers`; `loader` is the PEFT loader behind
`fastkeys.peft` (imports torch and peft). Imports every layer below; nothing imports it but the
public modules."""
