// A minimal streaming chat over the dsrt Go binding: each stdin line is a user message; the reply streams
// to stdout; Ctrl-C stops the current reply.
// usage: chat MODEL_DIR
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"

	"dsrt.local/dsrt"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: chat MODEL_DIR")
		os.Exit(2)
	}
	if err := run(os.Args[1]); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run(dir string) error {
	if err := dsrt.CheckVersion(); err != nil {
		return err
	}
	model, err := dsrt.LoadModel(dir, dsrt.ModelOptions{})
	if err != nil {
		return err
	}
	defer model.Close()
	engine, err := dsrt.NewEngine(model, 0)
	if err != nil {
		return err
	}
	defer engine.Close()
	session, err := dsrt.NewSession(engine)
	if err != nil {
		return err
	}
	defer session.Close()
	params := model.GenParams()
	params.MaxNewTokens = 256
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		if in.Text() == "" {
			continue
		}
		msg, _ := json.Marshal([]map[string]string{{"role": "user", "content": in.Text()}})
		if err := session.AppendChat(string(msg), true); err != nil {
			return err
		}
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
		st, err := session.Stream(ctx, params)
		if err != nil {
			stop()
			return err
		}
		for st.Next() {
			fmt.Print(st.Event().Text)
		}
		stop()
		fmt.Println()
		if st.Err() != nil {
			return st.Err()
		}
	}
	return in.Err()
}
