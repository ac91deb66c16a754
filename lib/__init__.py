"""The plumbing behind the method's files, one call each from them: the command line and input checks (cli), the
run folder around opd.train's loop (run), a group's video and prompt computed once (share), torchrun + FSDP2
(fsdp), the memory estimate (memory), comparing runs (report) and the miniature's builder (miniature).
A reader of the method skips this folder; nothing here imports a method (opd, grpo, tvdf, neighbours/)."""
