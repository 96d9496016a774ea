output "nat_gateway_public_ips" {
  description = "The Elastic IPs the Internet sees egressd's traffic from: put them in partners' allowlists and in the aws:SourceIp of deploy/aws/policies."
  value       = [for eip in aws_eip.nat : eip.public_ip]
}

output "proxy_url" {
  description = "The forward proxy for the browsers' proxy setting (or the PROXY line of a PAC file)."
  value       = "http://${aws_lb.egressd.dns_name}:3128"
}

output "dns_servers" {
  description = "The load balancer's fixed addresses: the browser VPC's DNS servers (set by its DHCP options)."
  value       = values(local.nlb_ips)
}

output "load_balancer_dns_name" {
  description = "DNS name of the internal Network Load Balancer."
  value       = aws_lb.egressd.dns_name
}

output "autoscaling_group_name" {
  description = "The Auto Scaling group (start an instance refresh after changing the binary or the config)."
  value       = aws_autoscaling_group.egressd.name
}

output "egress_vpc_id" {
  description = "The egress VPC."
  value       = aws_vpc.egress.id
}

output "s3_vpc_endpoint_id" {
  description = "The S3 gateway endpoint: the aws:SourceVpce of deploy/aws/policies/s3-bucket-policy.json.tftpl."
  value       = aws_vpc_endpoint.s3.id
}

output "appliance_security_group_id" {
  description = "Security group of the instances."
  value       = aws_security_group.appliance.id
}

output "s3_bucket_policies" {
  description = "For each of protected_bucket_names, a bucket policy admitting requests only through the egress path and only from the organization's principals."
  value = {
    for b in var.protected_bucket_names : b => templatefile("${path.module}/../policies/s3-bucket-policy.json.tftpl", {
      partition        = data.aws_partition.current.partition
      bucket           = b
      organization_id  = var.organization_id
      nat_eip_cidrs    = [for eip in aws_eip.nat : "${eip.public_ip}/32"]
      vpc_endpoint_ids = [aws_vpc_endpoint.s3.id]
    })
  }
}
