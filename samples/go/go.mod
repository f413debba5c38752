module dsrt.local/chat

go 1.19

require dsrt.local/dsrt v0.0.0

replace dsrt.local/dsrt => ../../bindings/go
