module vicd/tether

go 1.19
