module dsrt.local/dsrt

go 1.19
