// Package greeter is the gRPC service the L7 tests and benchmarks run on real grpc-go: it
// answers "Hello from <name>", and on request streams, fails with a given status and
// trailers, sleeps, or sends a large message. Its messages are protobuf StringValues, so it
// needs no generated code.
package greeter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Method names, as clients call them.
const (
	Service = "portico.test.Greeter"
	Hello   = "/" + Service + "/Hello" // unary
	Count   = "/" + Service + "/Count" // server streaming
	Sum     = "/" + Service + "/Sum"   // client streaming
	Echo    = "/" + Service + "/Echo"  // bidirectional
)

// Server is one greeter.
type Server struct {
	Name string
	// Delay is added to every call.
	Delay time.Duration
	// Calls counts the calls it received.
	Calls atomic.Int64
	// LastDeadline is how long the last call had left when it arrived (0: no deadline).
	LastDeadline atomic.Int64
}

// Register adds the greeter to a gRPC server.
func (g *Server) Register(s *grpc.Server) {
	s.RegisterService(&desc, g)
}

// Hello answers "Hello from <name>", or, when the request says so:
//
//	fail:<code>:<message>  that status, with the trailer "portico-test: failed"
//	sleep:<duration>       the answer, after the duration
//	big:<bytes>            an answer of that many bytes
func (g *Server) hello(ctx context.Context, req string) (string, error) {
	g.Calls.Add(1)
	if d, ok := ctx.Deadline(); ok {
		g.LastDeadline.Store(int64(time.Until(d)))
	} else {
		g.LastDeadline.Store(0)
	}
	if err := g.wait(ctx, g.Delay); err != nil {
		return "", err
	}
	verb, arg, _ := strings.Cut(req, ":")
	switch verb {
	case "fail":
		code, msg, _ := strings.Cut(arg, ":")
		n, _ := strconv.Atoi(code)
		_ = grpc.SetTrailer(ctx, metadata.Pairs("portico-test", "failed"))
		return "", status.Error(codes.Code(n), msg)
	case "sleep":
		d, _ := time.ParseDuration(arg)
		if err := g.wait(ctx, d); err != nil {
			return "", err
		}
	case "big":
		n, _ := strconv.Atoi(arg)
		return strings.Repeat("x", n), nil
	}
	return "Hello from " + g.Name, nil
}

func (g *Server) wait(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	select {
	case <-time.After(d):
		return nil
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	}
}

var desc = grpc.ServiceDesc{
	ServiceName: Service,
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{MethodName: "Hello", Handler: func(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
		in := new(wrapperspb.StringValue)
		if err := dec(in); err != nil {
			return nil, err
		}
		out, err := srv.(*Server).hello(ctx, in.Value)
		if err != nil {
			return nil, err
		}
		return wrapperspb.String(out), nil
	}}},
	Streams: []grpc.StreamDesc{
		{StreamName: "Count", ServerStreams: true, Handler: count},
		{StreamName: "Sum", ClientStreams: true, Handler: sum},
		{StreamName: "Echo", ServerStreams: true, ClientStreams: true, Handler: echo},
	},
}

// StreamDesc returns the description a client needs to open one of the streams.
func StreamDesc(method string) *grpc.StreamDesc {
	for i := range desc.Streams {
		if strings.HasSuffix(method, "/"+desc.Streams[i].StreamName) {
			return &desc.Streams[i]
		}
	}
	panic("greeter: no stream " + method)
}

// count answers "<n>:<interval>" with n messages "<name> <i>", one per interval.
func count(srv any, stream grpc.ServerStream) error {
	g := srv.(*Server)
	g.Calls.Add(1)
	in := new(wrapperspb.StringValue)
	if err := stream.RecvMsg(in); err != nil {
		return err
	}
	ns, every, _ := strings.Cut(in.Value, ":")
	n, err := strconv.Atoi(ns)
	if err != nil {
		return status.Error(codes.InvalidArgument, "want <n>:<interval>")
	}
	d, _ := time.ParseDuration(every)
	for i := range n {
		if i > 0 {
			if err := g.wait(stream.Context(), d); err != nil {
				return err
			}
		}
		if err := stream.SendMsg(wrapperspb.String(fmt.Sprintf("%s %d", g.Name, i))); err != nil {
			return err
		}
	}
	return nil
}

// sum answers with the total length of the messages it received.
func sum(srv any, stream grpc.ServerStream) error {
	srv.(*Server).Calls.Add(1)
	total := 0
	for {
		in := new(wrapperspb.StringValue)
		err := stream.RecvMsg(in)
		if errors.Is(err, io.EOF) {
			return stream.SendMsg(wrapperspb.String(strconv.Itoa(total)))
		}
		if err != nil {
			return err
		}
		total += len(in.Value)
	}
}

// echo answers each message with "<name>: <message>" as it arrives.
func echo(srv any, stream grpc.ServerStream) error {
	g := srv.(*Server)
	g.Calls.Add(1)
	for {
		in := new(wrapperspb.StringValue)
		err := stream.RecvMsg(in)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := stream.SendMsg(wrapperspb.String(g.Name + ": " + in.Value)); err != nil {
			return err
		}
	}
}

// Call makes a unary call and returns the answer.
func Call(ctx context.Context, cc grpc.ClientConnInterface, req string, opts ...grpc.CallOption) (string, error) {
	out := new(wrapperspb.StringValue)
	err := cc.Invoke(ctx, Hello, wrapperspb.String(req), out, opts...)
	return out.Value, err
}
