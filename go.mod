module github.com/clusterclient/clusterclient

go 1.24
