"""The build loop around a running `lsync connect`: the control socket (`control`,
`control_server`, `controlpath`), its handlers for one target and for several (`loop`,
`fleetloop`), the commands that talk to it (`commands`: flush, status, run), the rewriting of
remote paths in a command's output (`pathmap`) and pulling artefacts back (`pull`,
`pullcommand`, `pullrules`).
"""
