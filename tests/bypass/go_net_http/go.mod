module flashgate.test/bypass/gonethttp

go 1.22
