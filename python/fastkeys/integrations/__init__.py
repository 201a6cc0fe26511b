"""What fastkeys does inside other libraries' loaders. The public modules are `fastkeys.peft`,
`fastkeys.transformers` and `fastkeys.diffusers`; `recorder` is the one mechanism they all see raw
load results by (wrappers installed once, a thread-local stack of loads, the verified versions,
the missing-keys warning; imports none of the libraries); `loader` is the PEFT loader behind
`fastkeys.peft` (imports torch and peft). Imports every layer below; nothing imports it but the
public modules."""
