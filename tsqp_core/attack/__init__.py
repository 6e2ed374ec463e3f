"""Playing the GPU side: record everything it receives and answers (:mod:`.view`), then
attack that view with the public weights."""
